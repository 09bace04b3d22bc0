"""What a job returns: encoded images (:mod:`.images`), the PNG text chunk (:mod:`.png`), and delivery as data URIs
or bucket uploads (:mod:`.delivery`)."""
