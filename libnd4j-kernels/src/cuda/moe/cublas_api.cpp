// cublas_api.cpp — dlopen cuBLAS once per process and resolve the entry points the MoE block calls.
#include "cuda/moe/cublas_api.h"

#include <dlfcn.h>

#include <mutex>
#include <string>
#include <type_traits>

namespace deepep4j {
namespace cuda {

const Cublas* load_cublas(const char** why) {
  static std::once_flag once;
  static Cublas api;
  static bool loaded = false;
  static std::string error;
  std::call_once(once, [] {
    void* lib = nullptr;
    std::string tried;
    for (const char* name : {"libcublas.so.13", "libcublas.so.12", "libcublas.so"}) {
      lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (lib != nullptr) {
        api.library = name;
        break;
      }
      const char* e = dlerror();
      tried += std::string(tried.empty() ? "" : "; ") + (e ? e : name);
    }
    if (lib == nullptr) {
      error = "cuBLAS not found (" + tried + ")";
      return;
    }
    bool all = true;
    auto get = [&](auto& fn, const char* name, bool required) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
      if (fn == nullptr && required) {
        all = false;
        error = std::string(api.library) + " lacks " + name;
      }
    };
    get(api.Create, "cublasCreate_v2", true);
    get(api.Destroy, "cublasDestroy_v2", true);
    get(api.SetStream, "cublasSetStream_v2", true);
    get(api.SetWorkspace, "cublasSetWorkspace_v2", true);
    get(api.GetVersion, "cublasGetVersion_v2", true);
    get(api.GemmEx, "cublasGemmEx", true);
    get(api.GemmGroupedBatchedEx, "cublasGemmGroupedBatchedEx", false);
    loaded = all;
  });
  if (!loaded && why) *why = error.c_str();
  return loaded ? &api : nullptr;
}

}  // namespace cuda
}  // namespace deepep4j
