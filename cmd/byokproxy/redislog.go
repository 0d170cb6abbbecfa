package main

import (
	"context"
	"fmt"
	"log/slog"
)

// redisLogger sends go-redis's internal messages (dial failures, pool
// retries) to the process's structured log instead of standard error.
type redisLogger struct {
	log *slog.Logger
}

func (l redisLogger) Printf(ctx context.Context, format string, v ...any) {
	l.log.WarnContext(ctx, fmt.Sprintf(format, v...))
}
