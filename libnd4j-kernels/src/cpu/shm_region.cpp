// shm_region.cpp — POSIX shared memory (shm_open + mmap); pages are committed lazily as rings are touched.
#include "shm_region.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>

namespace deepep4j {

ShmRegion::~ShmRegion() {
  if (data_ != nullptr) munmap(data_, size_);
  unlink();
}

int ShmRegion::create(size_t bytes, int rank) {
  static std::atomic<unsigned> counter{0};
  char name[64];
  unsigned long long t = (unsigned long long)std::chrono::steady_clock::now().time_since_epoch().count();
  snprintf(name, sizeof(name), "/deepep4j.%d.%d.%u.%llx", (int)getpid(), rank, counter.fetch_add(1), t & 0xffffffffull);
  int fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) return errno;
  if (ftruncate(fd, (off_t)bytes) != 0) {
    int e = errno;
    close(fd);
    shm_unlink(name);
    return e;
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
  int e = errno;
  close(fd);
  if (p == MAP_FAILED) {
    shm_unlink(name);
    return e;
  }
  data_ = p;
  size_ = bytes;
  name_ = name;
  owner_ = true;
  linked_ = true;
  return 0;
}

int ShmRegion::open(const std::string& name, size_t bytes) {
  int fd = shm_open(name.c_str(), O_RDWR, 0600);
  if (fd < 0) return errno;
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
  int e = errno;
  close(fd);
  if (p == MAP_FAILED) return e;
  data_ = p;
  size_ = bytes;
  name_ = name;
  return 0;
}

void ShmRegion::unlink() {
  if (owner_ && linked_) {
    shm_unlink(name_.c_str());
    linked_ = false;
  }
}

}  // namespace deepep4j
