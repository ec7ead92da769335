"""apq.predictor"""
