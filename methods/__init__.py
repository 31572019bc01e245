"""The method zoo (installed as ``fewstep_rl.methods``): one file per method, registered through the
``fewstep_rl.methods`` entry-point group. No method imports another method."""
