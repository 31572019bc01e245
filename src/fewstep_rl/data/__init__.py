"""fewstep_rl.data"""
