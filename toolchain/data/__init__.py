"""apq.toolchain.data"""
