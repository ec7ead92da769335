// apq-run: run a TVM Relax VM executable (model.so) on .npy inputs, write .npy outputs.
//
// Why a C++ runner: an ARM board (or qemu-aarch64 on this host) has no Python/TVM install;
// all it needs is this binary plus libtvm_runtime.so and libtvm_ffi.so from the aarch64
// wheels. Only tvm-ffi headers are used (TVM's own runtime headers include files the wheel
// does not ship), and libtvm_runtime is linked with --no-as-needed so that its static
// initialisers register the Relax VM loader that model.so's embedded executable needs.
//
//   apq-run model.so --input in0.npy [--input in1.npy ...] --output-dir DIR [--repeat N]
//
// Prints one JSON line on stdout; on failure prints "apq-run: error: <one line>" on stderr
// and exits 2 (bad arguments / input files) or 3 (the model failed to load or run).
//
// Timing (--repeat N) is std::chrono wall time of whole `main` calls in this process. It is
// only meaningful on real hardware: apq never passes --repeat when running under qemu, since
// an emulated CPU's timings say nothing about the board.
#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "npy.h"

namespace ffi = tvm::ffi;

namespace {

constexpr int kExitUsage = 2;
constexpr int kExitModel = 3;
constexpr int kPooledAllocator = 2;  // tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ModelError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string model;
  std::vector<std::string> inputs;
  std::string output_dir;
  int repeat = 0;
};

const char* kUsage =
    "usage: apq-run MODEL.so --input IN0.npy [--input IN1.npy ...] --output-dir DIR [--repeat N]";

Options ParseArgs(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto need_value = [&](const std::string& flag) -> std::string {
      if (i + 1 >= argc) throw UsageError(flag + " needs a value; " + kUsage);
      return argv[++i];
    };
    if (a == "--input" || a == "-i") {
      opt.inputs.push_back(need_value(a));
    } else if (a == "--output-dir" || a == "-o") {
      opt.output_dir = need_value(a);
    } else if (a == "--repeat") {
      std::string v = need_value(a);
      char* end = nullptr;
      long n = std::strtol(v.c_str(), &end, 10);
      if (end == v.c_str() || *end != '\0' || n < 0 || n > 1000000) {
        throw UsageError("--repeat needs a non-negative integer, got '" + v + "'");
      }
      opt.repeat = static_cast<int>(n);
    } else if (a == "--help" || a == "-h") {
      std::cout << kUsage << std::endl;
      std::exit(0);
    } else if (!a.empty() && a[0] == '-') {
      throw UsageError("unknown option " + a + "; " + kUsage);
    } else if (opt.model.empty()) {
      opt.model = a;
    } else {
      throw UsageError("unexpected argument " + a + "; " + kUsage);
    }
  }
  if (opt.model.empty()) throw UsageError(std::string("no model library given; ") + kUsage);
  if (opt.output_dir.empty()) throw UsageError(std::string("--output-dir is required; ") + kUsage);
  return opt;
}

std::string OneLine(std::string s) {
  std::replace(s.begin(), s.end(), '\n', ' ');
  std::replace(s.begin(), s.end(), '\r', ' ');
  return s;
}

std::string JsonEscape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += ' ';
    } else {
      out += c;
    }
  }
  return out;
}

std::string ShapeJson(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

/*! \brief Allocator for input tensors; the runner owns them, so plain aligned malloc suffices. */
struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = std::max<size_t>(ffi::GetDataSize(*t), 1);
    n = (n + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, n);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

ffi::Tensor ToTensor(const apq::npy::Array& arr) {
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(),
                                           ffi::ShapeView(arr.shape.data(), arr.shape.size()),
                                           arr.dtype->dl,
                                           DLDevice{kDLCPU, 0});
  if (!arr.data.empty()) std::memcpy(t.data_ptr(), arr.data.data(), arr.data.size());
  return t;
}

/*! \brief Flatten the VM's return value (a tensor or nested tuples of tensors) in order. */
void CollectOutputs(const ffi::Any& value, std::vector<ffi::Tensor>* out) {
  if (auto t = value.as<ffi::Tensor>()) {
    out->push_back(*t);
    return;
  }
  if (auto arr = value.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& v : *arr) CollectOutputs(v, out);
    return;
  }
  throw ModelError("model returned a value of type " + value.GetTypeKey() +
                   ", expected tensors or tuples of tensors");
}

struct Model {
  ffi::Module lib;  // keeps model.so loaded while its tensors/functions live
  ffi::Module vm;
  ffi::Function main;
  int64_t arity = -1;
};

Model LoadModel(const std::string& path) {
  if (!std::filesystem::is_regular_file(path)) throw UsageError("model library not found: " + path);
  // dlopen treats a name without '/' as a library to search for: always pass an absolute path.
  ffi::Module lib = ffi::Module::LoadFromFile(std::filesystem::absolute(path).string());
  auto load_exec = lib->GetFunction("vm_load_executable", true);
  if (!load_exec.has_value()) {
    throw ModelError(path + " is not a TVM Relax VM executable (no vm_load_executable)");
  }
  ffi::Module vm = (*load_exec)().cast<ffi::Module>();
  auto init = vm->GetFunction("vm_initialization", false);
  if (!init.has_value()) throw ModelError("VM module has no vm_initialization");
  // One CPU device with the pooled allocator, as relax.VirtualMachine(ex, tvm.cpu()) does.
  (*init)(static_cast<int>(kDLCPU), 0, kPooledAllocator);
  auto main_fn = vm->GetFunction("main", false);
  if (!main_fn.has_value()) throw ModelError(path + " has no 'main' function");
  int64_t arity = -1;
  if (auto arity_fn = vm->GetFunction("get_function_arity", false)) {
    arity = (*arity_fn)(ffi::String("main")).cast<int64_t>();
  }
  return Model{lib, vm, *main_fn, arity};
}

Model LoadModelOrThrow(const std::string& path) {
  try {
    return LoadModel(path);
  } catch (const ffi::Error& e) {
    throw ModelError("cannot load " + path + ": " + e.kind() + ": " + e.message());
  }
}

std::vector<ffi::Tensor> Run(const Model& m, const std::vector<ffi::Tensor>& inputs) {
  std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
  ffi::Any result;
  m.main.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
  std::vector<ffi::Tensor> outs;
  CollectOutputs(result, &outs);
  return outs;
}

int Main(int argc, char** argv) {
  Options opt = ParseArgs(argc, argv);

  std::vector<apq::npy::Array> arrays;
  for (const std::string& p : opt.inputs) arrays.push_back(apq::npy::Read(p));

  Model model = LoadModelOrThrow(opt.model);
  if (model.arity >= 0 && model.arity != static_cast<int64_t>(arrays.size())) {
    throw UsageError("model 'main' takes " + std::to_string(model.arity) + " input(s), got " +
                     std::to_string(arrays.size()) + " --input file(s)");
  }

  std::vector<ffi::Tensor> inputs;
  for (const auto& a : arrays) inputs.push_back(ToTensor(a));

  std::vector<ffi::Tensor> outputs;
  std::vector<double> run_ms;
  try {
    outputs = Run(model, inputs);
    // Timed repeats after the first (warm-up) call; see the file comment about emulation.
    for (int r = 0; r < opt.repeat; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      Run(model, inputs);
      auto t1 = std::chrono::steady_clock::now();
      run_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
  } catch (const ffi::Error& e) {
    throw ModelError("running main failed: " + e.kind() + ": " + e.message());
  }

  std::error_code ec;
  std::filesystem::create_directories(opt.output_dir, ec);
  if (ec) throw UsageError("cannot create output dir " + opt.output_dir + ": " + ec.message());

  std::ostringstream js;
  js << "{\"ok\": true, \"model\": \"" << JsonEscape(opt.model) << "\", \"num_inputs\": "
     << inputs.size() << ", \"outputs\": [";
  for (size_t i = 0; i < outputs.size(); ++i) {
    const ffi::Tensor& t = outputs[i];
    if (t.device().device_type != kDLCPU) throw ModelError("output " + std::to_string(i) + " is not on the CPU");
    if (!t.IsContiguous()) throw ModelError("output " + std::to_string(i) + " is not contiguous");
    const apq::npy::DTypeEntry* dt = apq::npy::FindByDL(t.dtype());
    if (dt == nullptr) {
      throw ModelError("output " + std::to_string(i) + " has a dtype .npy export does not support");
    }
    std::vector<int64_t> shape(t.shape().begin(), t.shape().end());
    std::string file = "out" + std::to_string(i) + ".npy";
    std::string path = (std::filesystem::path(opt.output_dir) / file).string();
    const char* data = static_cast<const char*>(t.data_ptr()) + t.byte_offset();
    apq::npy::Write(path, *dt, shape, data, ffi::GetDataSize(*t.GetDLTensorPtr()));
    js << (i ? ", " : "") << "{\"file\": \"" << file << "\", \"shape\": " << ShapeJson(shape)
       << ", \"dtype\": \"" << dt->name << "\"}";
  }
  js << "]";
  if (opt.repeat > 0) {
    js << ", \"repeat\": " << opt.repeat << ", \"run_ms\": [";
    for (size_t i = 0; i < run_ms.size(); ++i) js << (i ? ", " : "") << run_ms[i];
    js << "]";
  }
  js << "}";
  std::cout << js.str() << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Main(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "apq-run: error: " << OneLine(e.what()) << std::endl;
    return kExitUsage;
  } catch (const ModelError& e) {
    std::cerr << "apq-run: error: " << OneLine(e.what()) << std::endl;
    return kExitModel;
  } catch (const ffi::Error& e) {
    std::cerr << "apq-run: error: " << OneLine(e.kind() + ": " + e.message()) << std::endl;
    return kExitModel;
  } catch (const std::exception& e) {
    // npy::Read/Write failures: the user's files.
    std::cerr << "apq-run: error: " << OneLine(e.what()) << std::endl;
    return kExitUsage;
  }
}
