// `fp8pipe prepare-data OUT_PREFIX FILE... [--format flat|megatron] [--dtype uint16|uint32]
// [--split-docs] [--fim-rate R] [--fim-seed S]`: byte-level tokenization of text files into a
// training token file (core/data.h): byte b -> id b, each document ends with id 256, so
// model.vocab_size must be >= 257; with fill-in-the-middle, a share R of the documents is
// rewritten in DeepSeek-V3's PSM form with sentinels 257..259 (vocab >= 260).
#include <fmt/format.h>

#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/data.h"
#include "core/log.h"
#include "launch/commands.h"

namespace fp8pipe::cli {
namespace {

constexpr char kUsage[] =
    "usage: fp8pipe prepare-data OUT_PREFIX FILE... [--format flat|megatron] "
    "[--dtype uint16|uint32] [--split-docs] [--fim-rate R] [--fim-seed S]\n"
    "  Byte-level tokens: byte b -> id b (0..255), end-of-document 256 (vocab 257).\n"
    "  Documents are the files, or with --split-docs the runs of non-blank lines.\n"
    "  --fim-rate R (0..1; DeepSeek-V3 0.1): that share of documents, chosen by --fim-seed\n"
    "  (default 0), is written fill-in-the-middle, <fim_begin> prefix <fim_hole> suffix\n"
    "  <fim_end> middle <end-of-document>, cut at two random character boundaries; the\n"
    "  sentinels are ids 257, 258, 259 (vocab 260).\n"
    "  Writes OUT_PREFIX.bin (flat: raw ids; megatron: plus OUT_PREFIX.idx, one sequence per\n"
    "  document; --dtype uint32 is written as int32 there, Megatron has no uint32).\n";

struct Args {
  std::string prefix;
  std::vector<std::string> files;
  data::PrepareOptions opt;
};

Result<Args> parse_args(int argc, char** argv) {
  Args a;
  std::vector<std::string> pos;
  for (int i = 0; i < argc; ++i) {
    const std::string s = argv[i];
    const bool has_value = i + 1 < argc;
    if (s == "--format" && has_value) {
      const std::string v = argv[++i];
      if (v != "flat" && v != "megatron") {
        return FP8_INVALID("--format is '{}'; valid choices: flat, megatron", v);
      }
      a.opt.format = v == "flat" ? data::FileFormat::kFlat : data::FileFormat::kMegatron;
    } else if (s == "--dtype" && has_value) {
      const std::string v = argv[++i];
      if (v != "uint16" && v != "uint32") {
        return FP8_INVALID("--dtype is '{}'; valid choices: uint16, uint32", v);
      }
      a.opt.dtype = v == "uint16" ? data::TokenDType::kUInt16 : data::TokenDType::kUInt32;
    } else if (s == "--split-docs") {
      a.opt.split_docs = true;
    } else if (s == "--fim-rate" && has_value) {
      const std::string v = argv[++i];
      char* end = nullptr;
      a.opt.fim.rate = std::strtod(v.c_str(), &end);
      if (v.empty() || *end != '\0' || !(a.opt.fim.rate >= 0 && a.opt.fim.rate <= 1)) {
        return FP8_INVALID("--fim-rate is '{}'; it must be a number in [0, 1] (DeepSeek-V3: 0.1)",
                           v);
      }
    } else if (s == "--fim-seed" && has_value) {
      const std::string v = argv[++i];
      char* end = nullptr;
      errno = 0;
      a.opt.fim.seed = std::strtoull(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0' || !std::isdigit(static_cast<unsigned char>(v[0])) ||
          errno == ERANGE) {
        return FP8_INVALID("--fim-seed is '{}'; it must be an integer in [0, 2^64)", v);
      }
    } else if (s.starts_with("--")) {
      return FP8_INVALID("unknown or incomplete option '{}'", s);
    } else {
      pos.push_back(s);
    }
  }
  if (pos.size() < 2) return FP8_INVALID("need OUT_PREFIX and at least one FILE");
  a.prefix = pos[0];
  a.files.assign(pos.begin() + 1, pos.end());
  return a;
}

}  // namespace

int cmd_prepare_data(int argc, char** argv) {
  if (argc == 1 && (std::string(argv[0]) == "--help" || std::string(argv[0]) == "-h")) {
    fmt::print("{}", kUsage);
    return 0;
  }
  auto args = parse_args(argc, argv);
  if (!args.ok()) {
    log::error("prepare-data: {}\n{}", args.status().to_string(), kUsage);
    return 2;
  }
  const Args& a = args.value();
  auto st = data::prepare_byte_data(a.prefix, a.files, a.opt);
  if (!st.ok()) {
    log::error("prepare-data: {}", st.status().to_string());
    return 1;
  }
  const bool megatron = a.opt.format == data::FileFormat::kMegatron;
  const bool fim = a.opt.fim.rate > 0;
  fmt::print(
      "wrote {}.bin{}: {} files, {} bytes in, {} documents{}, {} tokens ({}, {}); vocab {} "
      "(bytes 0..255, end-of-document {}{})\n",
      a.prefix, megatron ? fmt::format(" + {}.idx", a.prefix) : "", st->files, st->bytes_in,
      st->documents, fim ? fmt::format(" ({} fill-in-the-middle)", st->fim_documents) : "",
      st->tokens, megatron ? "megatron" : "flat", data::dtype_name(st->dtype),
      fim ? data::kByteFimVocab : data::kByteVocab, data::kEndOfDocument,
      fim ? fmt::format(", fim_begin {}, fim_hole {}, fim_end {}", data::kFimBegin, data::kFimHole,
                        data::kFimEnd)
          : "");
  return 0;
}

}  // namespace fp8pipe::cli
