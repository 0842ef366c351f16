// File helpers shared by the tests: a fresh per-test temporary directory and whole-file reads.
#pragma once

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

namespace fp8pipe::testing {

// <TempDir>/fp8pipe_<tag>_<pid>_<suite>_<test>, emptied and created.
inline std::filesystem::path temp_dir(const char* tag) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::filesystem::path d =
      std::filesystem::path(::testing::TempDir()) /
      fmt::format("fp8pipe_{}_{}_{}_{}", tag, ::getpid(), info->test_suite_name(), info->name());
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

inline std::vector<uint8_t> read_file(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}

}  // namespace fp8pipe::testing
