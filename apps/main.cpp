// The `salad` command line: `salad <subcommand> --help` for each. Each
// apps/cmd_*.cpp adds its subcommands through one add_*_commands function.
#include <CLI/CLI.hpp>
#include <c10/util/Exception.h>

#include <cstdio>

#include "commands.h"
#include "salad/layout.h"

int main(int argc, char** argv) {
  CLI::App app{"salad: SALAD sparse + linear attention for video diffusion transformers"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "salad 0.1.0");
  salad::cli::Commands cmds;
  salad::cli::add_all_commands(app, cmds);
  CLI11_PARSE(app, argc, argv);
  try {
    for (auto& [sub, run] : cmds)
      if (sub->parsed()) return run();
  } catch (const salad::ArgumentError& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what_without_backtrace());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
