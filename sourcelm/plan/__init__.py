"""`sourcelm plan`: size a DeepSeek-V3-style training run on a cluster before renting it.

  cluster.py        cluster descriptions (clusters/*.toml: H800, H100, H200) and measure.py (this machine)
  layout.py         a layout (PP, EP, DP, schedule, batches, dtype, recomputation) and its validation
  model_costs.py    the model as pipeline slots: parameters, FLOPs per pass, activation bytes
  comms.py          dispatch/combine rows per link class from a routing (exact), collectives
  memory.py         memory per rank, and whether it fits
  pipeline_sim.py   an event simulator of 1F1B, ZB1P, DualPipe and DualPipeV (the report's Table 2); 1F1B and
                    DualPipeV are the trainer's (parallel/pipeline_plan.py)
  estimate.py       step time, tokens/s per GPU, MFU, GPU-hours
  search.py         layouts that fit, fastest first; what makes a layout fit
  output.py, commands.py  tables, JSON and the command line
"""
