// shm_region.h — one POSIX shared-memory mapping: created by its owner rank, opened by name by its peers.
#pragma once

#include <cstddef>
#include <string>

namespace deepep4j {

class ShmRegion {
 public:
  ShmRegion() = default;
  ShmRegion(const ShmRegion&) = delete;
  ShmRegion& operator=(const ShmRegion&) = delete;
  ~ShmRegion();

  // Creates a new zero-filled region under a unique name. Returns 0 or an errno value.
  int create(size_t bytes, int rank);
  // Maps a region a peer created. Returns 0 or an errno value.
  int open(const std::string& name, size_t bytes);
  // Removes the name (the mapping stays valid); peers can no longer open it.
  void unlink();

  void* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& name() const { return name_; }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
  std::string name_;
  bool owner_ = false;
  bool linked_ = false;
};

}  // namespace deepep4j
