"""Each job's logic (Ray-free stage classes plus their driver): vocab, pools (with the token search),
tokenize, train, evaluate (with the shared evaluator), report and decode."""
