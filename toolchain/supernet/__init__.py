"""apq.toolchain.supernet"""
