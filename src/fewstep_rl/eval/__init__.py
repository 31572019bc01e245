"""fewstep_rl.eval"""
