from typical_decoder import Typical

from peftgen.testing import check_decoder


def test_typical_conforms():
    check_decoder(Typical)  # the defaults
    check_decoder(Typical, tau=0.5)  # and options worth covering
