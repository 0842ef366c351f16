// The GPU micro-benchmarks (launch/gpu_bench.cu, built with CUDA): FP8 GEMM through LtGemm vs the
// raw cuBLASLt call vs BF16, and quantize vs a device-to-device copy. argv as a main()'s (argv[0]
// is the program name): [--json FILE] [--reps N] [--warmup N] [--flush-l2] [--quick]. Returns 0
// when every benchmark ran, 1 on a failure, 2 on bad arguments.
#pragma once

namespace fp8pipe::cli {
int run_gpu_bench(int argc, char** argv);
}
