"""The model a worker serves: where it is (:mod:`.location`), loading it (:mod:`.loading`), where it runs
(:mod:`.placement`), reading its weights ahead (:mod:`.prefetch`)."""
