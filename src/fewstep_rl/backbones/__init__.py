"""fewstep_rl.backbones"""
