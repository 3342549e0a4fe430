# cuda.cmake — the CUDA backend (ring kernels over NVLink, NCCL all-to-all loaded at run time), its GPU tests (ctest
# label "gpu"; they exit 77 = skipped where no GPU is visible) and the CUDA half of bench_ep. Included at the end of
# ../../CMakeLists.txt when nvcc is found, after the targets deepep4j, deepep4j_static and bench_ep exist.
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  # Ampere and Hopper machine code, plus Hopper PTX so newer GPUs can JIT it.
  set(CMAKE_CUDA_ARCHITECTURES "80-real;90-real;90-virtual")
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
set(CMAKE_CUDA_VISIBILITY_PRESET hidden)
set(CMAKE_CUDA_RUNTIME_LIBRARY Static)

set(DEEPEP4J_CUDA_DIR ${CMAKE_CURRENT_LIST_DIR})
set(DEEPEP4J_CUDA_SOURCES
  ${DEEPEP4J_CUDA_DIR}/factory.cu
  ${DEEPEP4J_CUDA_DIR}/cuda_backend.cu
  ${DEEPEP4J_CUDA_DIR}/deepep_backend.cu
  ${DEEPEP4J_CUDA_DIR}/alltoall_backend.cu
  ${DEEPEP4J_CUDA_DIR}/control.cu
  ${DEEPEP4J_CUDA_DIR}/dispatch.cu
  ${DEEPEP4J_CUDA_DIR}/combine.cu
  ${DEEPEP4J_CUDA_DIR}/ring_trace.cu
  ${DEEPEP4J_CUDA_DIR}/copy_engine.cu
  ${DEEPEP4J_CUDA_DIR}/copy_engine_kernels.cu
  ${DEEPEP4J_CUDA_DIR}/a2a_kernels.cu
  ${DEEPEP4J_CUDA_DIR}/stack_limit.cpp
  ${DEEPEP4J_CUDA_DIR}/nccl_api.cpp
  ${DEEPEP4J_CUDA_DIR}/device_queue.cu
  ${DEEPEP4J_CUDA_DIR}/moe/cublas_api.cpp
  ${DEEPEP4J_CUDA_DIR}/moe/moe_ops_cuda.cu
  ${DEEPEP4J_CUDA_DIR}/moe/moe_router.cu
  ${DEEPEP4J_CUDA_DIR}/moe/moe_permute.cu
  ${DEEPEP4J_CUDA_DIR}/moe/moe_rows.cu
  ${DEEPEP4J_CUDA_DIR}/moe/moe_swiglu.cu
  ${DEEPEP4J_CUDA_DIR}/moe/moe_optimizer.cu
  ${DEEPEP4J_CUDA_DIR}/moe/moe_accumulate.cu)
set(DEEPEP4J_CUDA_WARNINGS -Werror=all-warnings -Xcompiler=-Wall,-Wextra,-Werror,-fvisibility-inlines-hidden)

# Compiled once into the object library that both deepep4j and deepep4j_static are linked from.
target_sources(deepep4j_objects PRIVATE ${DEEPEP4J_CUDA_SOURCES})
foreach(target deepep4j_objects deepep4j deepep4j_static)
  # These targets were made before CUDA was enabled, so they need the CUDA properties set here.
  set_target_properties(${target} PROPERTIES CUDA_RUNTIME_LIBRARY Static CUDA_VISIBILITY_PRESET hidden
                                             CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}")
endforeach()
target_compile_options(deepep4j_objects PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:${DEEPEP4J_CUDA_WARNINGS}>)
# Every kernel's stack frame is checked as it compiles (stack_frames.cmake): above CUDA's default 1 KB stack only the
# any-R specialisations (template argument DEEPEP4J_MAX_RANKS = 64, mangled "ILi64E"), whose buffers raise the limit.
option(DEEPEP4J_CHECK_STACK_FRAMES "Fail the build when an engine kernel's stack frame exceeds the default stack" ON)
if(DEEPEP4J_CHECK_STACK_FRAMES)
  # A launcher the user set (ccache, say) still runs: it follows "--" as the start of the command to check.
  set(stack_check "${CMAKE_COMMAND};-DLIMIT=1024;-DALLOWED=ILi64E;-P;${DEEPEP4J_CUDA_DIR}/stack_frames.cmake;--")
  list(APPEND stack_check ${CMAKE_CUDA_COMPILER_LAUNCHER})
  set_target_properties(deepep4j_objects PROPERTIES CUDA_COMPILER_LAUNCHER "${stack_check}")
endif()
target_link_libraries(deepep4j_objects PUBLIC CUDA::cudart_static)
foreach(target deepep4j deepep4j_static)
  target_link_libraries(${target} PUBLIC CUDA::cudart_static ${CMAKE_DL_LIBS})
endforeach()

# GPU tests: one program per file in tests/gpu; 77 = no GPU here (skipped, not passed).
set(DEEPEP4J_GPU_TEST_DIR ${CMAKE_CURRENT_LIST_DIR}/../../tests/gpu)
set(DEEPEP4J_GPU_TESTS roundtrip cross_process peer_dies step_recovery moe_block stream_ordered stack_limit queue)
foreach(name IN LISTS DEEPEP4J_GPU_TESTS)
  add_executable(gpu_test_${name} ${DEEPEP4J_GPU_TEST_DIR}/test_gpu_${name}.cpp)
  target_include_directories(gpu_test_${name} PRIVATE ${DEEPEP4J_GPU_TEST_DIR} ${DEEPEP4J_GPU_TEST_DIR}/..
                                                      ${CMAKE_CURRENT_LIST_DIR}/../../include)
  target_compile_options(gpu_test_${name} PRIVATE ${DEEPEP4J_WARNINGS})
  target_link_libraries(gpu_test_${name} PRIVATE deepep4j_static CUDA::cudart_static Threads::Threads)
  add_test(NAME gpu_${name} COMMAND gpu_test_${name})
  set_tests_properties(gpu_${name} PROPERTIES TIMEOUT 600 LABELS gpu SKIP_RETURN_CODE 77)
endforeach()
# The stack-limit test checks the engine's kernel lists (src/cuda/kernels.h) themselves.
target_include_directories(gpu_test_stack_limit PRIVATE ${CMAKE_CURRENT_LIST_DIR}/..)
# The same round trips with every row through the SM rings, and every step by copy engines (buffers large enough):
# through the landing zones, and with rows written straight into recv_x (the tests' pools open to peer devices).
add_test(NAME gpu_roundtrip_sm COMMAND gpu_test_roundtrip)
add_test(NAME gpu_roundtrip_ce COMMAND gpu_test_roundtrip)
add_test(NAME gpu_roundtrip_ce_direct COMMAND gpu_test_roundtrip)
add_test(NAME gpu_cross_process_ce COMMAND gpu_test_cross_process)
set_tests_properties(gpu_roundtrip_sm gpu_roundtrip_ce gpu_roundtrip_ce_direct gpu_cross_process_ce PROPERTIES
                     TIMEOUT 600 LABELS gpu SKIP_RETURN_CODE 77)
set_tests_properties(gpu_roundtrip_sm PROPERTIES ENVIRONMENT DEEPEP4J_CUDA_TRANSFER=sm)
# Stream-ordered buffers, called with NULL streams (complete on return): device-numbered barriers, sticky failures.
add_test(NAME gpu_roundtrip_stream_ordered COMMAND gpu_test_roundtrip)
set_tests_properties(gpu_roundtrip_stream_ordered PROPERTIES TIMEOUT 600 LABELS gpu SKIP_RETURN_CODE 77 ENVIRONMENT
                     "DEEPEP4J_STREAM_ORDERED=1;DEEPEP4J_CUDA_TRANSFER=sm")
set_tests_properties(gpu_roundtrip_ce gpu_cross_process_ce PROPERTIES
                     ENVIRONMENT "DEEPEP4J_CUDA_TRANSFER=copy_engine;DEEPEP4J_TEST_BUFFER_MB=64")
set_tests_properties(gpu_roundtrip_ce_direct PROPERTIES ENVIRONMENT
                     "DEEPEP4J_CUDA_TRANSFER=copy_engine;DEEPEP4J_TEST_BUFFER_MB=64;DEEPEP4J_TEST_POOL_PEER_ACCESS=1")

if(TARGET bench_ep)
  target_sources(bench_ep PRIVATE ${CMAKE_CURRENT_LIST_DIR}/../../bench/bench_ep_cuda.cu)
  target_compile_definitions(bench_ep PRIVATE DEEPEP4J_BENCH_CUDA)
  set_target_properties(bench_ep PROPERTIES CUDA_RUNTIME_LIBRARY Static CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}")
  target_include_directories(bench_ep PRIVATE ${CMAKE_CURRENT_LIST_DIR}/../../bench ${CMAKE_CURRENT_LIST_DIR}/..)
  target_compile_options(bench_ep PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:${DEEPEP4J_CUDA_WARNINGS}>)
  target_link_libraries(bench_ep PRIVATE CUDA::cudart_static)
endif()

# bench_moe: the MoE block per rank on one GPU, with the dense GEMM rate beside it (one table).
add_executable(bench_moe ${CMAKE_CURRENT_LIST_DIR}/../../bench/bench_moe.cu)
set_target_properties(bench_moe PROPERTIES CUDA_RUNTIME_LIBRARY Static CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}")
target_include_directories(bench_moe PRIVATE ${CMAKE_CURRENT_LIST_DIR}/..)
target_compile_options(bench_moe PRIVATE ${DEEPEP4J_CUDA_WARNINGS})
target_link_libraries(bench_moe PRIVATE deepep4j_static CUDA::cudart_static Threads::Threads)

# bench_queue: where host arrays on a GPU spend their time (host memcpy, staged queue copies, the transfer ceiling).
add_executable(bench_queue ${CMAKE_CURRENT_LIST_DIR}/../../bench/bench_queue.cpp)
target_compile_options(bench_queue PRIVATE ${DEEPEP4J_WARNINGS})
target_link_libraries(bench_queue PRIVATE deepep4j_static CUDA::cudart_static Threads::Threads)
