"""Planning before loading: cost model, global order, mixtures, balance over ranks, step plans."""
