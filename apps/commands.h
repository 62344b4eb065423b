// Subcommand registration for the `salad` CLI: each apps/cmd_*.cpp defines one
// add_*_commands(app, cmds) that adds its subcommands and what they run.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <utility>
#include <vector>

namespace salad::cli {

using Commands = std::vector<std::pair<CLI::App*, std::function<int()>>>;

void add_attention_commands(CLI::App& app, Commands& cmds);  // info, bench-attn, select (cmd_attention.cpp)

inline void add_all_commands(CLI::App& app, Commands& cmds) {
  add_attention_commands(app, cmds);
}

}  // namespace salad::cli
