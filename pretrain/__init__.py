"""JAX pretraining stack: the `pretrain` command (cli) and the wiring of a run (build); each role in a
package of its own, the README's "How it is built" maps them."""
