# stack_frames.cmake — the compiler launcher of the engine's CUDA files (cuda.cmake): runs the nvcc command it is
# given with ptxas's resource report (-Xptxas=-v) and fails the compile when a kernel's stack frame exceeds LIMIT
# bytes (CUDA's default stack limit, 1 KB) unless its name matches ALLOWED (the any-R specialisations, which only
# buffers of more than kFewRanks ranks launch; their create raises the stack limit, see kernels.h). A kernel above the
# default stack makes every launch grow local memory, which waits for every running kernel on the device: with two
# ranks on one GPU, for the other rank's kernel spinning for this one.
# Run as: cmake -DLIMIT=1024 -DALLOWED=<regex> -P stack_frames.cmake -- <nvcc> <arguments...>
cmake_minimum_required(VERSION 3.22)
set(command "")
set(after_dashes FALSE)
math(EXPR last "${CMAKE_ARGC} - 1")
foreach(i RANGE ${last})
  if(after_dashes)
    list(APPEND command "${CMAKE_ARGV${i}}")
  elseif(CMAKE_ARGV${i} STREQUAL "--")
    set(after_dashes TRUE)
  endif()
endforeach()
if(NOT command)
  message(FATAL_ERROR "stack_frames.cmake: no compile command after --")
endif()
execute_process(COMMAND ${command} -Xptxas=-v RESULT_VARIABLE rc ERROR_VARIABLE err)

# ptxas reports, per architecture ("Compiling entry function '<name>' for 'sm_XX'"), each function's frame
# ("Function properties for <name>", then "<n> bytes stack frame"); every function is checked (a called function's
# frame adds to its kernel's). Everything else ptxas prints, and any other compiler message, is passed on.
string(REPLACE ";" "\\;" err "${err}")
string(REGEX REPLACE "\r?\n" ";" lines "${err}")
set(passed "")
set(entry "")
set(arch "")
set(too_large "")
foreach(line IN LISTS lines)
  if(line MATCHES "Compiling entry function '[^']+' for '([^']+)'")
    set(arch "${CMAKE_MATCH_1}")
  elseif(line MATCHES "Function properties for ([^ ]+)")
    set(entry "${CMAKE_MATCH_1}")
  elseif(line MATCHES "^ *([0-9]+) bytes stack frame")
    set(frame "${CMAKE_MATCH_1}")
    if(entry AND frame GREATER LIMIT AND NOT entry MATCHES "${ALLOWED}")
      string(APPEND too_large "\n  ${entry} (${arch}): ${frame} bytes")
    endif()
    set(entry "")
  elseif(NOT line MATCHES "^ptxas info" AND NOT line STREQUAL "")
    string(APPEND passed "${line}\n")
  endif()
endforeach()
if(passed)
  message("${passed}")
endif()
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "compile failed (${rc})")
endif()
if(too_large)
  message(FATAL_ERROR "kernels with a stack frame above ${LIMIT} bytes (CUDA's default stack limit is 1024); bound their "
                      "per-thread arrays by kFewRanks, or specialise them for any R and list that variant in its "
                      "file's load_*_kernels (src/cuda/kernels.h):${too_large}")
endif()
