"""Expert parallelism across (pretend or real) nodes: topology and process groups, DeepEP-shaped
dispatch/combine (flat and two-hop), and the expert-parallel routed-experts module.

The model stays single-device; `apply_expert_parallel` swaps its routed experts from outside."""
