"""apq.toolchain"""
