// Minimal NumPy .npy reader/writer for apq-run.
//
// Why hand-written: the runner must cross-compile for bare aarch64 boards with nothing but
// the tvm-ffi headers, so it cannot pull cnpy/zlib. apq only exchanges dense C-order
// little-endian arrays of a handful of dtypes, which is a ~100-line subset of the format:
// magic "\x93NUMPY", version, header length, a Python dict literal header, raw data.
#ifndef APQ_RUNNER_NPY_H_
#define APQ_RUNNER_NPY_H_

#include <dlpack/dlpack.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace apq {
namespace npy {

/*! \brief One dtype apq exchanges: its .npy descr, its DLPack type and its numpy name. */
struct DTypeEntry {
  const char* descr;  // e.g. "<f4"; '|' for single-byte types
  DLDataType dl;
  const char* name;   // numpy name, used in the JSON summary
};

// The registry of supported dtypes: adding one is one line.
inline const std::vector<DTypeEntry>& DTypeTable() {
  static const std::vector<DTypeEntry> table = {
      {"<f4", DLDataType{kDLFloat, 32, 1}, "float32"},
      {"<f2", DLDataType{kDLFloat, 16, 1}, "float16"},
      {"<f8", DLDataType{kDLFloat, 64, 1}, "float64"},
      {"|i1", DLDataType{kDLInt, 8, 1}, "int8"},
      {"|u1", DLDataType{kDLUInt, 8, 1}, "uint8"},
      {"<i4", DLDataType{kDLInt, 32, 1}, "int32"},
      {"<i8", DLDataType{kDLInt, 64, 1}, "int64"},
      {"|b1", DLDataType{kDLBool, 8, 1}, "bool"},
  };
  return table;
}

inline const DTypeEntry* FindByDescr(const std::string& descr) {
  // numpy writes "<i1"/"|i1" interchangeably for 1-byte types in some versions; normalise.
  std::string d = descr;
  if (d.size() == 3 && (d[0] == '<' || d[0] == '=') && d[2] == '1') d[0] = '|';
  if (d.size() == 3 && d[0] == '=') d[0] = '<';
  for (const auto& e : DTypeTable()) {
    if (d == e.descr) return &e;
  }
  return nullptr;
}

inline const DTypeEntry* FindByDL(DLDataType t) {
  for (const auto& e : DTypeTable()) {
    if (e.dl.code == t.code && e.dl.bits == t.bits && e.dl.lanes == t.lanes) return &e;
  }
  return nullptr;
}

/*! \brief A dense C-order array read from or written to a .npy file. */
struct Array {
  const DTypeEntry* dtype = nullptr;
  std::vector<int64_t> shape;
  std::vector<char> data;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  size_t itemsize() const { return (dtype->dl.bits * dtype->dl.lanes + 7) / 8; }
};

// ------------------------------------------------------------------ header parsing

inline std::string HeaderValue(const std::string& header, const std::string& key,
                               const std::string& path) {
  const std::string quoted = "'" + key + "'";
  size_t k = header.find(quoted);
  if (k == std::string::npos) throw std::runtime_error(path + ": .npy header has no '" + key + "'");
  size_t colon = header.find(':', k + quoted.size());
  if (colon == std::string::npos) throw std::runtime_error(path + ": malformed .npy header");
  size_t start = header.find_first_not_of(' ', colon + 1);
  if (start == std::string::npos) throw std::runtime_error(path + ": malformed .npy header");
  size_t end;
  if (header[start] == '\'') {
    end = header.find('\'', start + 1);
    if (end == std::string::npos) throw std::runtime_error(path + ": malformed .npy header");
    return header.substr(start + 1, end - start - 1);
  }
  if (header[start] == '(') {
    end = header.find(')', start);
    if (end == std::string::npos) throw std::runtime_error(path + ": malformed .npy header");
    return header.substr(start, end - start + 1);
  }
  end = header.find_first_of(",}", start);
  if (end == std::string::npos) throw std::runtime_error(path + ": malformed .npy header");
  return header.substr(start, end - start);
}

inline std::vector<int64_t> ParseShape(const std::string& tuple, const std::string& path) {
  // "(2, 3)", "(5,)" or "()" for a scalar.
  std::vector<int64_t> shape;
  std::string body = tuple.substr(1, tuple.size() - 2);
  std::stringstream ss(body);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t a = item.find_first_not_of(" \t");
    if (a == std::string::npos) continue;
    size_t b = item.find_last_not_of(" \tL");
    std::string num = item.substr(a, b - a + 1);
    char* endp = nullptr;
    long long v = std::strtoll(num.c_str(), &endp, 10);
    if (endp == num.c_str() || *endp != '\0' || v < 0) {
      throw std::runtime_error(path + ": bad shape entry '" + num + "' in .npy header");
    }
    shape.push_back(static_cast<int64_t>(v));
  }
  return shape;
}

/*! \brief Read a .npy file; throws std::runtime_error with a one-line message on any problem. */
inline Array Read(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open input file " + path);
  char magic[6];
  if (!f.read(magic, 6) || std::memcmp(magic, "\x93NUMPY", 6) != 0) {
    throw std::runtime_error(path + " is not a .npy file (bad magic)");
  }
  unsigned char ver[2];
  if (!f.read(reinterpret_cast<char*>(ver), 2)) throw std::runtime_error(path + ": truncated .npy");
  uint32_t hlen = 0;
  if (ver[0] == 1) {
    unsigned char b[2];
    if (!f.read(reinterpret_cast<char*>(b), 2)) throw std::runtime_error(path + ": truncated .npy");
    hlen = b[0] | (b[1] << 8);
  } else if (ver[0] == 2 || ver[0] == 3) {
    unsigned char b[4];
    if (!f.read(reinterpret_cast<char*>(b), 4)) throw std::runtime_error(path + ": truncated .npy");
    hlen = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
  } else {
    throw std::runtime_error(path + ": unsupported .npy version " + std::to_string(ver[0]));
  }
  std::string header(hlen, '\0');
  if (!f.read(&header[0], hlen)) throw std::runtime_error(path + ": truncated .npy header");

  Array arr;
  std::string descr = HeaderValue(header, "descr", path);
  arr.dtype = FindByDescr(descr);
  if (arr.dtype == nullptr) {
    throw std::runtime_error(path + ": unsupported dtype '" + descr +
                             "' (supported: float32/16/64, int8, uint8, int32, int64, bool)");
  }
  if (HeaderValue(header, "fortran_order", path) != "False") {
    throw std::runtime_error(path + ": Fortran-order arrays are not supported (save C order)");
  }
  arr.shape = ParseShape(HeaderValue(header, "shape", path), path);
  size_t nbytes = static_cast<size_t>(arr.numel()) * arr.itemsize();
  arr.data.resize(nbytes);
  if (nbytes > 0 && !f.read(arr.data.data(), static_cast<std::streamsize>(nbytes))) {
    throw std::runtime_error(path + ": truncated .npy data (expected " + std::to_string(nbytes) +
                             " bytes)");
  }
  return arr;
}

/*! \brief Write a dense C-order array as .npy v1.0 (header padded to 64 bytes like numpy). */
inline void Write(const std::string& path, const DTypeEntry& dtype, const std::vector<int64_t>& shape,
                  const void* data, size_t nbytes) {
  std::string shape_str = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    shape_str += std::to_string(shape[i]);
    if (shape.size() == 1 || i + 1 < shape.size()) shape_str += ",";
    if (i + 1 < shape.size()) shape_str += " ";
  }
  shape_str += ")";
  std::string header = std::string("{'descr': '") + dtype.descr +
                       "', 'fortran_order': False, 'shape': " + shape_str + ", }";
  const size_t prefix = 10;  // magic(6) + version(2) + header length(2)
  size_t total = prefix + header.size() + 1;
  size_t pad = (64 - total % 64) % 64;
  header.append(pad, ' ');
  header.push_back('\n');
  if (header.size() > 65535) throw std::runtime_error(path + ": .npy header too long");

  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw std::runtime_error("cannot write output file " + path);
  f.write("\x93NUMPY\x01\x00", 8);
  const unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xff),
                                static_cast<unsigned char>(header.size() >> 8)};
  f.write(reinterpret_cast<const char*>(len), 2);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(nbytes));
  if (!f) throw std::runtime_error("failed writing output file " + path);
}

}  // namespace npy
}  // namespace apq

#endif  // APQ_RUNNER_NPY_H_
