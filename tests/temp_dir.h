// A fresh directory under the temp dir, removed at scope exit (tests only).
#pragma once

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

namespace salad::test {

// Removes a directory of plain files and subdirectories. Not fs::remove_all,
// which binds to a broken copy exported by the pip libtorch.so (segfaults).
inline void remove_dir(const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> files, dirs;
  for (const auto& e : std::filesystem::directory_iterator(dir)) (e.is_directory() ? dirs : files).push_back(e.path());
  for (const auto& d : dirs) remove_dir(d);
  for (const auto& f : files) std::remove(f.c_str());
  ::rmdir(dir.c_str());
}

struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& prefix = "salad") {
    static int counter = 0;
    path = std::filesystem::temp_directory_path() /
           (prefix + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::create_directories(path);
  }
  ~TempDir() { remove_dir(path); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
};

}  // namespace salad::test
