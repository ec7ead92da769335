"""apq.targets"""
