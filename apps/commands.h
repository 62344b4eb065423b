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
void add_generate_commands(CLI::App& app, Commands& cmds);  // generate, bench-dit (cmd_generate.cpp)
void add_model_commands(CLI::App& app, Commands& cmds);  // convert, merge (cmd_model.cpp)
void add_world_commands(CLI::App& app, Commands& cmds);  // world, eval-video (cmd_world.cpp)

void add_train_commands(CLI::App& app, Commands& cmds);  // finetune, pretrain (cmd_train.cpp)

void add_experiment_commands(CLI::App& app, Commands& cmds);  // eval, demo (cmd_experiment.cpp)

inline void add_all_commands(CLI::App& app, Commands& cmds) {
  add_experiment_commands(app, cmds);
  add_train_commands(app, cmds);
  add_attention_commands(app, cmds);
  add_world_commands(app, cmds);
  add_generate_commands(app, cmds);
  add_model_commands(app, cmds);
}

}  // namespace salad::cli
