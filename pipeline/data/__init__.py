"""Images in, WebDataset shards out (``shards``), and shards streamed back (``stream``)."""
