package deps

import (
	_ "filippo.io/age"
	_ "github.com/alicebob/miniredis/v2"
	_ "github.com/elazarl/goproxy"
	_ "github.com/prometheus/client_golang/prometheus"
	_ "github.com/prometheus/common/expfmt"
	_ "github.com/redis/go-redis/v9"
	_ "github.com/spf13/viper"
	_ "golang.org/x/term"
)
