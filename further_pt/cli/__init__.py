"""The ``further-pt`` command (:mod:`.main`) and ``further-pt doctor`` (:mod:`.doctor`)."""
