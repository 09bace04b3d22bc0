"""What a job asks for: the request schema (:mod:`.schema`, one declaration per field) and the input images it names
(:mod:`.input_images`)."""
