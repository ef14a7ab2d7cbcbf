def pytest_configure(config):
    config.addinivalue_line("markers", "full_size: a full-size model on the CPU (about 1-3 minutes); `-m 'not full_size'` "
                                       "leaves it out")
