// Shared state of the mpirun-driven tests (CTest mpi.*): the MPI world, a layout for the started
// ranks and its communicators, made once by mpi_main.cc before the tests run.
#pragma once

#include "parallel/comm.h"
#include "parallel/topology.h"

namespace fp8pipe::parallel::mpitest {

constexpr double kTimeoutS = 30;  // every wait in these tests: a broken peer fails, never hangs

const MpiWorld& world();
const Topology& topo();
CommSet& comms();

}  // namespace fp8pipe::parallel::mpitest
