"""Array -> array kernels with no parameters.

Layout `[batch, seq, heads, dim]`; recurrent state `[batch, heads, key_dim,
value_dim]`; fp32 accumulation; outputs in the input dtype. Every op takes
`impl=` and every impl stays public.
"""
