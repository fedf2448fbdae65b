ALTER TABLE "node_drizzle_app"."todo" ADD COLUMN "done" boolean DEFAULT false NOT NULL;--> statement-breakpoint
CREATE INDEX "todo_owner_idx" ON "node_drizzle_app"."todo" USING btree ("owner");
