# CMake toolchain file: cross-compile apq-run for 64-bit ARM Linux boards (Raspberry Pi 3/4/5, ...)
# with Debian's aarch64-linux-gnu GCC. Binaries run on a board or here under
#   qemu-aarch64 -L /usr/aarch64-linux-gnu
# Usage: cmake -S . -B build-arm -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake \
#              -DAPQ_TVM_RUNTIME_DIR=<dir with aarch64 libtvm_runtime.so and libtvm_ffi.so>
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(APQ_CROSS_PREFIX "aarch64-linux-gnu-" CACHE STRING "Prefix of the cross toolchain executables")
set(CMAKE_C_COMPILER "${APQ_CROSS_PREFIX}gcc")
set(CMAKE_CXX_COMPILER "${APQ_CROSS_PREFIX}g++")

set(APQ_SYSROOT "/usr/aarch64-linux-gnu" CACHE PATH "Target root used by the linker and by qemu -L")
set(CMAKE_FIND_ROOT_PATH "${APQ_SYSROOT}")
# Programs come from the host; libraries and headers from the target root (plus explicit dirs).
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
