# tests.cmake — the CPU tests (ctest, label "cpu"). Included by ../CMakeLists.txt once the deepep4j_static and
# deepep4j targets exist. Each test_<name>.cpp is one program; `ctest -R cpu_<name>` runs it alone, and
# `test_<name> <filter>` runs only the cases whose name contains <filter>.
find_package(Threads REQUIRED)

set(DEEPEP4J_CPU_TESTS api_basics layout roundtrip cached chunked cross_process bad_input peer_mismatch peer_failure
    fail_step step_recovery moe_block queue)
foreach(name IN LISTS DEEPEP4J_CPU_TESTS)
  add_executable(test_${name} ${CMAKE_CURRENT_LIST_DIR}/test_${name}.cpp)
  target_include_directories(test_${name} PRIVATE ${CMAKE_CURRENT_LIST_DIR} ${CMAKE_CURRENT_LIST_DIR}/../include)
  target_compile_options(test_${name} PRIVATE ${DEEPEP4J_WARNINGS})
  target_link_libraries(test_${name} PRIVATE deepep4j_static Threads::Threads)
  add_test(NAME cpu_${name} COMMAND test_${name})
  set_tests_properties(cpu_${name} PROPERTIES TIMEOUT 240 LABELS cpu)
endforeach()

# The shared library's only exported symbols are the deepep4j_* functions of include/deepep4j.h.
add_test(NAME cpu_exported_symbols
         COMMAND ${CMAKE_COMMAND} -DLIB=$<TARGET_FILE:deepep4j> -DHEADER=${CMAKE_CURRENT_LIST_DIR}/../include/deepep4j.h
                 -P ${CMAKE_CURRENT_LIST_DIR}/exported_symbols.cmake)
set_tests_properties(cpu_exported_symbols PROPERTIES TIMEOUT 60 LABELS cpu)

# Ranks of one process copy rows directly by default; these runs force every row through the rings instead, so the
# ring protocol (the one separate processes always use) is covered by the in-process tests too.
foreach(name roundtrip cached chunked bad_input peer_failure step_recovery)
  add_test(NAME cpu_${name}_rings COMMAND test_${name})
  set_tests_properties(cpu_${name}_rings PROPERTIES TIMEOUT 240 LABELS cpu ENVIRONMENT DEEPEP4J_CPU_DIRECT=0)
endforeach()
