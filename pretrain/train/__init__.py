"""The training core: the train step (step) with its loss, optimizer and sharding rules, and the loop that runs it."""
