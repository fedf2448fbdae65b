CREATE SCHEMA "node_drizzle_app";
--> statement-breakpoint
CREATE TABLE "node_drizzle_app"."todo" (
	"id" serial PRIMARY KEY NOT NULL,
	"title" text NOT NULL,
	"owner" text DEFAULT current_setting('jwt.claims.sub') NOT NULL
);
