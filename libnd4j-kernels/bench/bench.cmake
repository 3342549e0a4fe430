# bench.cmake — bench_ep (CPU by default; src/cuda/cuda.cmake adds the CUDA part and defines DEEPEP4J_BENCH_CUDA).
# Included by ../CMakeLists.txt after the deepep4j target exists.
find_package(Threads REQUIRED)
add_executable(bench_ep ${CMAKE_CURRENT_LIST_DIR}/bench_ep.cpp)
target_include_directories(bench_ep PRIVATE ${CMAKE_CURRENT_LIST_DIR})
target_compile_options(bench_ep PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${DEEPEP4J_WARNINGS}>)
target_link_libraries(bench_ep PRIVATE deepep4j Threads::Threads)

# A small run in ctest keeps the bench (and its built-in result check) working; the real shape is run by hand.
add_test(NAME cpu_bench_smoke COMMAND bench_ep --tokens 256 --hidden 512 --topk 4 --experts 16 --iters 2 --warmup 1)
set_tests_properties(cpu_bench_smoke PROPERTIES TIMEOUT 120 LABELS cpu)
