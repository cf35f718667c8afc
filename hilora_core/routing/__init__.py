"""The HiLoRA method, readable top to bottom in data-flow order.

    gaussian          one Gaussian per adapter over its samples' embeddings (factored, Woodbury scoring)
    whitening         optional whitening of the embedding space
    calibration       eps chosen by leave-one-out on the registered samples
    fallback          the off-pool test: when no adapter covers a request, the base model serves it
    pool              the fitted pool: eps, space, Gaussians and off-pool threshold in one model
    sequence_routing  candidate set C, ROC budget O and its allocation o_i
    hilora            scores -> RoutingPlans (the hilora and hilora_gs policies)
    token_routing     per token, per layer: the top-o_i ROCs of each candidate, sqrt(rbar/O) scaling

Nothing here imports the baselines, the engine, Ray, Redis or HTTP.
"""
