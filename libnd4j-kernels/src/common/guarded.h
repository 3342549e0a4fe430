// guarded.h — the C boundary's catch-all: runs an entry point's body and turns what must never escape a C call
// (bad_alloc, logic errors) into a status with the thread's last error set.
#pragma once

#include <exception>
#include <new>

#include "backend.h"

namespace deepep4j {

template <class F>
int guarded(const char* call, F&& f) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return set_error(DEEPEP4J_ERR_OUT_OF_MEMORY, "%s: host allocation failed", call);
  } catch (const std::exception& e) {
    return set_error(DEEPEP4J_ERR_INTERNAL, "%s: %s", call, e.what());
  }
}

}  // namespace deepep4j
