"""Performance tooling: real-size architectures with random weights, FLOP counting, the memory planner's inputs and
the speed flags (autocast, attention backend, compile, checkpointing, overlapped reward scoring)."""
