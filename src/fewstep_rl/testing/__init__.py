"""fewstep_rl.testing"""
