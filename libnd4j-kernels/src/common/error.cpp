// error.cpp — the thread-local last error and the names of statuses and dtypes.
#include <cstdarg>
#include <cstdio>
#include <string>

#include "backend.h"

namespace deepep4j {

static thread_local std::string t_last_error;

int set_error(int status, const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  t_last_error = buf;
  return status;
}

int ok() {
  t_last_error.clear();
  return DEEPEP4J_OK;
}

const char* last_error() { return t_last_error.c_str(); }

size_t dtype_size(int32_t dtype) {
  switch (dtype) {
    case DEEPEP4J_FLOAT32: return 4;
    case DEEPEP4J_BFLOAT16: return 2;
    case DEEPEP4J_FLOAT16: return 2;
    case DEEPEP4J_FP8_E4M3: return 1;
    case DEEPEP4J_FLOAT64: return 8;
    default: return 0;
  }
}

const char* dtype_name(int32_t dtype) {
  switch (dtype) {
    case DEEPEP4J_FLOAT32: return "float32";
    case DEEPEP4J_BFLOAT16: return "bfloat16";
    case DEEPEP4J_FLOAT16: return "float16";
    case DEEPEP4J_FP8_E4M3: return "fp8_e4m3";
    case DEEPEP4J_FLOAT64: return "float64";
    default: return "unknown";
  }
}

}  // namespace deepep4j

extern "C" const char* deepep4j_last_error(void) { return deepep4j::last_error(); }

extern "C" const char* deepep4j_status_name(int status) {
  switch (status) {
    case DEEPEP4J_OK: return "DEEPEP4J_OK";
    case DEEPEP4J_ERR_INVALID_ARGUMENT: return "DEEPEP4J_ERR_INVALID_ARGUMENT";
    case DEEPEP4J_ERR_PEER_MISMATCH: return "DEEPEP4J_ERR_PEER_MISMATCH";
    case DEEPEP4J_ERR_PEER_ERROR: return "DEEPEP4J_ERR_PEER_ERROR";
    case DEEPEP4J_ERR_TIMEOUT: return "DEEPEP4J_ERR_TIMEOUT";
    case DEEPEP4J_ERR_OUT_OF_MEMORY: return "DEEPEP4J_ERR_OUT_OF_MEMORY";
    case DEEPEP4J_ERR_UNAVAILABLE: return "DEEPEP4J_ERR_UNAVAILABLE";
    case DEEPEP4J_ERR_STATE: return "DEEPEP4J_ERR_STATE";
    case DEEPEP4J_ERR_INTERNAL: return "DEEPEP4J_ERR_INTERNAL";
    default: return "DEEPEP4J_ERR_UNKNOWN";
  }
}
