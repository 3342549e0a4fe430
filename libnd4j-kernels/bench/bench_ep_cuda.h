// bench_ep_cuda.h — the CUDA half of bench_ep (bench_ep --device cuda ...); built when nvcc is found.
#pragma once

// Runs the GPU benchmark table; returns the process exit code.
int bench_ep_cuda(int argc, char** argv);
