package queen

import "context"

// gateway is the OpenAI-compatible HTTP server (see gateway_http.go).
type gateway struct{}

func startGateway(q *Queen, addr string) (*gateway, error) { return &gateway{}, nil }

func (g *gateway) shutdown(ctx context.Context) {}
