// The standalone `gpu_bench` binary (launch/device_check.sh runs it): launch/gpu_bench.cu's main.
#include "launch/gpu_bench.h"

int main(int argc, char** argv) { return fp8pipe::cli::run_gpu_bench(argc, argv); }
