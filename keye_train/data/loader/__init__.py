"""Loading planned steps: encode records, decode on workers or I/O servers, pack microbatches."""
