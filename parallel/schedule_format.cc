// Text, timing and drawing of schedules (see schedule_format.h): the §5 format, the full dump,
// a list scheduler over the instruction lists, Table 2's bubble formulas, Chrome trace and SVG.
#include "parallel/schedule_format.h"

#include <algorithm>
#include <charconv>
#include <map>

namespace fp8pipe::parallel {
namespace {

const char* op_name(Op op) {
  switch (op) {
    case Op::kF:
      return "F";
    case Op::kB:
      return "B";
    case Op::kW:
      return "W";
    case Op::kFB:
      return "FB";
    case Op::kSendAct:
      return "SEND_ACT";
    case Op::kRecvAct:
      return "RECV_ACT";
    case Op::kSendGrad:
      return "SEND_GRAD";
    case Op::kRecvGrad:
      return "RECV_GRAD";
  }
  return "?";
}

std::string compute_line(int rank, const Instr& in) {
  if (in.op == Op::kFB) {
    return fmt::format("rank={} FB mb={},{} dir={},{}", rank, in.mb, in.mb_b, in.dir, in.dir_b);
  }
  return fmt::format("rank={} {} mb={} dir={}", rank, op_name(in.op), in.mb, in.dir);
}

}  // namespace

std::string format_schedule(const Schedule& s) {
  std::string out;
  for (int r = 0; r < s.ranks; ++r) {
    for (const Instr& in : s.rank_instrs[r]) {
      if (!in.is_comm()) out += compute_line(r, in) + "\n";
    }
  }
  return out;
}

std::string format_instructions(const Schedule& s) {
  std::string out;
  for (int r = 0; r < s.ranks; ++r) {
    for (const Instr& in : s.rank_instrs[r]) {
      if (in.op == Op::kFB) {
        out += fmt::format("{} stage={},{}\n", compute_line(r, in), in.stage, in.stage_b);
      } else if (in.is_comm()) {
        out += fmt::format("{} stage={} peer={}\n", compute_line(r, in), in.stage, in.peer);
      } else {
        out += fmt::format("{} stage={}{}\n", compute_line(r, in), in.stage,
                           in.defer_w ? " defer_w" : "");
      }
    }
  }
  return out;
}

Result<Costs> parse_costs(std::string_view text) {
  std::vector<double> v;
  for (size_t pos = 0;;) {
    const size_t comma = std::min(text.find(',', pos), text.size());
    double x = 0;
    auto [p, ec] = std::from_chars(text.data() + pos, text.data() + comma, x);
    if (ec != std::errc() || p != text.data() + comma || x < 0) {
      return FP8_INVALID("--cost '{}': item {} is not a number >= 0 (expected F,B,W,FB)", text,
                         v.size() + 1);
    }
    v.push_back(x);
    if (comma == text.size()) break;
    pos = comma + 1;
  }
  if (v.size() != 4) return FP8_INVALID("--cost '{}': expected 4 numbers F,B,W,FB", text);
  if (v[2] > v[1]) return FP8_INVALID("--cost '{}': W ({}) > B ({})", text, v[2], v[1]);
  return Costs{v[0], v[1], v[2], v[3]};
}

double op_cost(const Instr& in, const Costs& c) {
  switch (in.op) {
    case Op::kF:
      return c.f;
    case Op::kB:
      return in.defer_w ? c.b - c.w : c.b;
    case Op::kW:
      return c.w;
    case Op::kFB:
      return c.fb;
    default:
      return 0;
  }
}

Result<Timeline> simulate_timeline(const Schedule& s, const Costs& c) {
  Timeline t;
  t.busy.assign(s.ranks, 0);
  std::vector<double> now(s.ranks, 0);
  std::vector<size_t> pc(s.ranks, 0);
  std::map<Transfer, double> posted;
  for (int r = 0; r < s.ranks; ++r) {
    t.start.emplace_back(s.rank_instrs[r].size(), 0);
    t.end.emplace_back(s.rank_instrs[r].size(), 0);
  }
  for (bool moved = true; moved;) {
    moved = false;
    for (int r = 0; r < s.ranks; ++r) {
      for (; pc[r] < s.rank_instrs[r].size(); ++pc[r], moved = true) {
        const Instr& in = s.rank_instrs[r][pc[r]];
        double done = now[r] + op_cost(in, c);
        if (in.op == Op::kSendAct || in.op == Op::kSendGrad) posted[transfer_of(s, r, in)] = now[r];
        if (in.op == Op::kRecvAct || in.op == Op::kRecvGrad) {
          auto it = posted.find(transfer_of(s, r, in));
          if (it == posted.end()) break;
          done = std::max(now[r], it->second);
        }
        t.start[r][pc[r]] = now[r];
        t.end[r][pc[r]] = now[r] = done;
        t.busy[r] += op_cost(in, c);
      }
    }
  }
  for (int r = 0; r < s.ranks; ++r) {
    if (pc[r] < s.rank_instrs[r].size()) {
      return FP8_INVALID(
          "timeline: rank {} is stuck at instruction #{} ({}); validate the schedule", r, pc[r],
          instr_label(s.rank_instrs[r][pc[r]]));
    }
    t.makespan = std::max(t.makespan, now[r]);
  }
  return t;
}

double table2_bubble(const Schedule& s, const Costs& c) {
  switch (s.kind) {
    case ScheduleKind::k1F1B:
      return (s.ranks - 1) * (c.f + c.b);
    case ScheduleKind::kZB1P:
      return (s.ranks - 1) * (c.f + c.b - 2 * c.w);
    case ScheduleKind::kDualPipe:
    case ScheduleKind::kDualPipeV:
      return (s.stages() / 2 - 1) * (c.fb + c.b - 3 * c.w);
  }
  return 0;
}

std::string format_bubbles(const Schedule& s, const Timeline& t, const Costs& c) {
  std::string out;
  for (int r = 0; r < s.ranks; ++r) {
    out += fmt::format("rank={} busy={:g} bubble={:g}\n", r, t.busy[r], t.bubble(r));
  }
  out += fmt::format("makespan={:g} table2_bubble={:g} (costs F={:g} B={:g} W={:g} FB={:g})\n",
                     t.makespan, table2_bubble(s, c), c.f, c.b, c.w, c.fb);
  return out;
}

std::string chrome_trace_json(const Schedule& s, const Timeline& t) {
  constexpr double kUs = 1000;  // one cost unit = 1 ms
  std::string out = "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n";
  const char* sep = "";
  for (int r = 0; r < s.ranks; ++r) {
    out += fmt::format(
        "{}{{\"ph\":\"M\",\"pid\":{},\"name\":\"process_name\",\"args\":{{\"name\":\"rank {}\"}}}}"
        ",\n{{\"ph\":\"M\",\"pid\":{},\"tid\":0,\"name\":\"thread_name\",\"args\":{{\"name\":"
        "\"compute\"}}}},\n{{\"ph\":\"M\",\"pid\":{},\"tid\":1,\"name\":\"thread_name\","
        "\"args\":{{\"name\":\"comm\"}}}}",
        sep, r, r, r, r);
    sep = ",\n";
    for (size_t i = 0; i < s.rank_instrs[r].size(); ++i) {
      const Instr& in = s.rank_instrs[r][i];
      out += fmt::format(
          ",\n{{\"name\":\"{}\",\"cat\":\"{}\",\"ph\":\"X\",\"pid\":{},\"tid\":{},\"ts\":{:.3f},"
          "\"dur\":{:.3f},\"args\":{{\"mb\":{},\"dir\":{},\"stage\":{},\"peer\":{}}}}}",
          instr_label(in), op_name(in.op), r, in.is_comm() ? 1 : 0, t.start[r][i] * kUs,
          (t.end[r][i] - t.start[r][i]) * kUs, in.mb, in.dir, in.stage, in.peer);
    }
  }
  return out + "\n]}\n";
}

namespace {

// Fill colour of one half-cell: hue by micro-batch (dir 0 warm 0-150°, dir 1 cool 180-330°),
// lightness by op (F light, B dark, W pale).
std::string cell_colour(const Schedule& s, Op op, int mb, int dir) {
  const double hue = (dir == 0 ? 0.0 : 180.0) + 150.0 * mb / std::max(1, s.mb_per_stream());
  const int light = op == Op::kF ? 72 : op == Op::kB ? 42 : 90;
  return fmt::format("hsl({:.0f},{}%,{}%)", hue, dir == 0 ? 85 : 60, light);
}

// One rectangle with its micro-batch number centred in it.
std::string svg_cell(double x, double y, double w, double h, const std::string& fill, Op op,
                     int mb) {
  const char* stroke = op == Op::kW ? " stroke-dasharray=\"3,2\"" : "";
  const char* ink = op == Op::kB ? "#fff" : "#000";
  return fmt::format(
      "<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"{}\" "
      "stroke=\"#333\" stroke-width=\"0.6\"{}/><text x=\"{:.1f}\" y=\"{:.1f}\" fill=\"{}\">{}"
      "</text>\n",
      x, y, w, h, fill, stroke, x + w / 2, y + h / 2 + 4, ink, mb);
}

}  // namespace

std::string timeline_svg(const Schedule& s, const Timeline& t, const Costs& c) {
  const double unit = std::clamp(1400.0 / std::max(1.0, t.makespan), 4.0, 40.0);
  const double left = 70, top = 34, row = 26, cell = 22, right = 130;
  const double width = left + t.makespan * unit + right, height = top + s.ranks * row + 40;
  std::string out = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{:.0f}\" height=\"{:.0f}\" "
      "font-family=\"sans-serif\" font-size=\"11\" text-anchor=\"middle\">\n"
      "<rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n<text x=\"{:.0f}\" y=\"18\" "
      "text-anchor=\"start\" font-size=\"13\">{} · {} ranks · {} micro-batches · F={:g} B={:g} "
      "W={:g} F&amp;B={:g} · makespan {:g} · Table 2 bubble {:g}</text>\n",
      width, height, left, schedule_kind_name(s.kind), s.ranks, s.microbatches, c.f, c.b, c.w, c.fb,
      t.makespan, table2_bubble(s, c));
  for (int r = 0; r < s.ranks; ++r) {
    const double y = top + r * row;
    out += fmt::format("<text x=\"8\" y=\"{:.1f}\" text-anchor=\"start\">Rank {}</text>\n",
                       y + cell / 2 + 4, r);
    for (size_t i = 0; i < s.rank_instrs[r].size(); ++i) {
      const Instr& in = s.rank_instrs[r][i];
      const double x = left + t.start[r][i] * unit, w = (t.end[r][i] - t.start[r][i]) * unit;
      if (in.is_comm() || w <= 0) continue;
      if (in.op != Op::kFB) {
        out += svg_cell(x, y, w, cell, cell_colour(s, in.op, in.mb, in.dir), in.op, in.mb);
        continue;
      }
      const double wf = c.f + c.b > 0 ? w * c.f / (c.f + c.b) : w / 2;
      out += svg_cell(x, y, wf, cell, cell_colour(s, Op::kF, in.mb, in.dir), Op::kF, in.mb);
      out += svg_cell(x + wf, y, w - wf, cell, cell_colour(s, Op::kB, in.mb_b, in.dir_b), Op::kB,
                      in.mb_b);
      out += fmt::format(
          "<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"none\" "
          "stroke=\"#000\" stroke-width=\"1.6\"/>\n",
          x, y, w, cell);
    }
    out += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"start\">bubble {:g}</text>\n",
                       left + t.makespan * unit + 8, y + cell / 2 + 4, t.bubble(r));
  }
  out += fmt::format(
      "<text x=\"{:.0f}\" y=\"{:.1f}\" text-anchor=\"start\">hue = micro-batch (warm: dir 0, cool: "
      "dir 1) · light = F · dark = B · pale dashed = W · boxed pair = overlapped F&amp;B</text>\n",
      left, top + s.ranks * row + 22);
  return out + "</svg>\n";
}

}  // namespace fp8pipe::parallel
