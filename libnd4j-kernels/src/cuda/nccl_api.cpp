// nccl_api.cpp — dlopen("libnccl.so.2") once per process and resolve the few symbols we call.
#include "cuda/nccl_api.h"

#include <dlfcn.h>

#include <mutex>
#include <type_traits>
#include <string>

namespace deepep4j {
namespace cuda {

const Nccl* load_nccl(const char** why) {
  static std::once_flag once;
  static Nccl api;
  static bool loaded = false;
  static std::string error;
  std::call_once(once, [] {
    void* lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      const char* e = dlerror();
      error = e ? e : "dlopen failed";
      return;
    }
    bool all = true;
    auto get = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
      if (fn == nullptr) {
        all = false;
        error = std::string("libnccl.so.2 lacks ") + name;
      }
    };
    get(api.GetUniqueId, "ncclGetUniqueId");
    get(api.CommInitRank, "ncclCommInitRank");
    get(api.CommDestroy, "ncclCommDestroy");
    get(api.CommAbort, "ncclCommAbort");
    get(api.Send, "ncclSend");
    get(api.Recv, "ncclRecv");
    get(api.GroupStart, "ncclGroupStart");
    get(api.GroupEnd, "ncclGroupEnd");
    get(api.GetErrorString, "ncclGetErrorString");
    loaded = all;
  });
  if (!loaded && why) *why = error.c_str();
  return loaded ? &api : nullptr;
}

}  // namespace cuda
}  // namespace deepep4j
