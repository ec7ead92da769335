"""apq.kernels"""
